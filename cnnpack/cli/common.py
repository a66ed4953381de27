"""What every command module shares: the `app` they register on, the one-line error handling, the option parsers.

The command modules import this; `cnnpack.cli` imports them (so each registers itself) and this, never the other
way round.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from cnnpack.errors import file_error

# click's UsageError, from whichever click this typer carries (its own copy since typer 0.2x, click itself before)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line_usage_errors(command_path: str):
    """A usage error (unknown option or command, a missing or malformed one) as one stderr line and exit 2, like
    every other bad input; click's default is a four-line usage box. `cnnpack` alone still shows the help."""
    try:
        yield
    except _USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            if e.format_message().strip():  # the plain help (a narrow terminal) is its message: typer shows none
                typer.echo(e.format_message())
                raise typer.Exit(2) from None
            raise  # rich printed the help while making the message
        path = e.ctx.command_path if e.ctx is not None else command_path
        msg = e.format_message().strip().rstrip(".")
        typer.echo(f"error: {path}: {msg[:1].lower()}{msg[1:]} (see `{path} -h`)", err=True)
        raise typer.Exit(2) from None


def _flags_untyped(display_type_rich):
    """typer (0.2x) labels every option in the help with its type; a flag takes no value, and `<bool>` beside it
    reads as if it did."""

    @functools.wraps(display_type_rich)
    def without_bool(self, ctx):
        return None if getattr(self, "is_flag", False) else display_type_rich(self, ctx)

    return without_bool


if hasattr(TyperOption, "display_type_rich"):
    TyperOption.display_type_rich = _flags_untyped(TyperOption.display_type_rich)


NARROW = 110  # columns: below, rich's help table cuts or splits names and defaults (`--latency-budget-…`)


def _plain_when_narrow(format_help):
    """Help in click's plain layout on a terminal narrower than NARROW: rich's table gives each of its six columns a
    share of the width and cut names a user must type (`--latency-budget-…`, or `--credentials-secr` + `et`); click's
    two columns keep each name whole and wrap only the prose. Wide terminals keep rich's panels."""

    @functools.wraps(format_help)
    def choose(self, ctx, formatter):
        import shutil

        if shutil.get_terminal_size().columns >= NARROW or getattr(self, "rich_markup_mode", None) is None:
            return format_help(self, ctx, formatter)
        self.rich_markup_mode, mode = None, self.rich_markup_mode
        try:
            return format_help(self, ctx, formatter)
        finally:
            self.rich_markup_mode = mode

    return choose


TyperGroup.format_help = _plain_when_narrow(TyperGroup.format_help)
TyperCommand.format_help = _plain_when_narrow(TyperCommand.format_help)


class _Group(TyperGroup):
    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors(info_name or self.name or "cnnpack"):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors(ctx.command_path):
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="cnnpack",
    help="Train an image-classification CNN, export it (ONNX, pt2, TorchScript, OpenVINO), quantize it to int8 "
    "under an accuracy gate, prove the exports match, benchmark them, serve them with Triton, tune the served "
    "config and deploy it to Kubernetes.\n\nExample: cnnpack pipeline",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STATE = {"debug": False}


def table_console(width: int, *, stderr: bool = False):
    """A rich Console for a table: the terminal's width on a terminal; `width` columns when the output goes to a
    file or a pipe, where rich would assume 80 and squeeze a wide table's cells to single letters."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else width)


def print_error(msg: str) -> None:
    """`error: <msg>` on stderr: the one line every refusal prints."""
    typer.echo(f"error: {msg}", err=True)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (from `kill`, systemd, a CI runner) and SIGHUP (the terminal closed, an ssh session dropped) stop a
    command the way Ctrl-C does: what it started (a Triton server, its temporary folder) is stopped and removed, and a
    write in progress is finished first. A SIGHUP ignored already (`nohup`) stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signals = [signal.SIGTERM] + [signal.SIGHUP] * (signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN)
    old = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, was in old.items():
            signal.signal(sig, was)


def handles_errors(fn):
    """Turns cnnpack errors into one stderr line and the exit code of their class."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cnnpack.errors import CnnpackError

        try:
            _refuse_non_finite(kwargs)
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except CnnpackError as e:
            if STATE["debug"]:  # the traceback too, with the same exit code
                import traceback

                traceback.print_exc()
            elif replaced := _replaced_meanwhile(e):
                print_error(replaced)
                raise typer.Exit(1) from None
            else:
                print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            if not _stdout_gone():  # a server's connection, say: an error as any other
                raise
            # `cnnpack infer ... | head`: the reader took what it wanted; typer made this exit 1, without a word
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush writes nowhere)
            raise typer.Exit(0) from None
        except OSError as e:  # a path the system refused: an output under a file, a read-only or full disk
            if replaced := not STATE["debug"] and _replaced_meanwhile(e):
                print_error(replaced)
                raise typer.Exit(1) from None
            if STATE["debug"] or not isinstance(e.filename, (str, bytes, os.PathLike)):
                raise
            print_error(file_error(e))
            raise typer.Exit(2 if e.errno in _PATH_ERRNOS else 1) from None

    return wrapper


def _replaced_meanwhile(error: Exception) -> str | None:
    """Where a run the command opened was replaced by another process meanwhile (`train --force`), what to say
    instead of `error`: reading the old run's files while they were set aside, the command failed on the first one
    gone, whose error blames the run ("its training did not finish an epoch") rather than the replacement."""
    from cnnpack.errors import RunReplaced

    rundir = sys.modules.get("cnnpack.rundir")  # (no run opened where it was never imported)
    return None if rundir is None or isinstance(error, RunReplaced) else rundir.replaced_meanwhile()


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`| head` done reading)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (captured)
        return False


def _refuse_non_finite(options: dict) -> None:
    """nan and inf parse as floats but are no option's value: every number cnnpack takes is finite (a limit, a
    tolerance, a budget), and a non-finite one would pass `> 0` checks (nan) and be written as invalid JSON."""
    import math

    from cnnpack.errors import UserInputError

    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


# the path given cannot be used (bad input, exit 2); others (a full disk, an I/O error) are failures (exit 1)
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP}


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))


def default_run_dir(prefix: str) -> Path:
    """A new folder under runs/: runs/<prefix>-<n>."""
    root = Path("runs")
    n = 1
    while (root / f"{prefix}-{n}").exists():
        n += 1
    return root / f"{prefix}-{n}"


def _version(asked: bool) -> None:
    if asked:
        from cnnpack import __version__

        typer.echo(f"cnnpack {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
          _: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print cnnpack's version and exit.")):
    STATE["debug"] = debug


def usage_error(msg: str) -> typer.Exit:
    """Prints a usage error; `raise usage_error(...)` exits 2."""
    print_error(msg)
    return typer.Exit(2)


def given_options(ctx: typer.Context, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """The options of the running command given on its command line (not left at their defaults): name -> the flag
    as given (`--no-amp`, not `--amp`)."""
    return {p.name: as_flag(p, ctx.params.get(p.name), with_value=False) for p in ctx.command.params
            if p.name not in exclude
            and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def as_flag(param, value, *, with_value: bool = True) -> str:
    """An option and its value as a user types them: `--no-amp` (not `--amp False`), `--epochs 5`; `--epochs` alone
    without `with_value`."""
    if isinstance(value, bool) and param.secondary_opts:
        return param.opts[0] if value else param.secondary_opts[0]
    return f"{param.opts[0]} {value}" if with_value and not isinstance(value, bool) else param.opts[0]


def int_list(text: str, flag: str) -> tuple[int, ...]:
    """`1,8,32` -> (1, 8, 32), a repeat dropped; anything else (an empty list or item too: `1,,2` is a typo, one
    trailing comma is not) is a usage error naming `flag`."""
    if not text.strip():
        raise usage_error(f"{flag} is empty; give comma-separated integers")
    try:
        values = tuple(dict.fromkeys(int(v) for v in text.strip().removesuffix(",").split(",")))
    except ValueError:
        raise usage_error(f"{flag} takes comma-separated integers, got {text!r}") from None
    return values


def name_list(text: str) -> tuple[str, ...]:
    """`onnx, torchscript,onnx` -> ("onnx", "torchscript"): stripped, empty items and repeats dropped (in order)."""
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def served_options(triton_url: str | None, **given: tuple[object, object]) -> None:
    """Refuses options of a served model (`flag_name=(value, default)`) given without --triton-url, where they would
    be ignored, and an empty --triton-url."""
    if triton_url is not None and not triton_url.strip():
        raise usage_error("--triton-url is empty; give the server's HOST:PORT")
    if triton_url is None:
        for name, (value, default) in given.items():
            if value != default:
                raise usage_error(f"--{name.replace('_', '-')} is for a served model: give the server with "
                                  "--triton-url HOST:PORT too")
