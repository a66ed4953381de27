"""Your own network: `--arch FILE.py:NAME` (or `--arch package.module:NAME`) builds the model from your code.

NAME is an `nn.Module` subclass or a function returning one. It is called with `num_classes=K` where its signature
takes that argument (or `**kwargs`), else with no argument, and its forward must give `(N, K)` logits for `(N, 3, H, W)`
images (checked before anything is written). A file path is recorded absolute in the run's model spec, with a sha256
over it and the files of its folder that it imports (`arch_source`, the imports read from its import statements):
every later stage rebuilds the network from that code, says so where it has changed since, the pipeline trains again
when it changes, and a resume of it is refused. The exported artifacts do not need the file.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpack.errors import UserInputError, one_line

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_warned: set[tuple[str, str]] = set()


def is_user_arch(arch: str) -> bool:
    """`SOURCE:NAME`: the built-in and torchvision names have no colon."""
    return ":" in arch


def _split(arch: str) -> tuple[str, str]:
    source, _, name = arch.rpartition(":")
    if not source or not name.isidentifier():
        raise UserInputError(f"--arch {arch}: your own model is named FILE.py:NAME or package.module:NAME (NAME a class "
                             "or function of that file or module that returns an nn.Module)")
    if not source.endswith(".py") and not _MODULE_PATH.fullmatch(source):
        raise UserInputError(f"--arch {arch}: {source!r} is neither a .py file nor a module path (package.module)")
    return source, name


def recorded(arch: str) -> str:
    """`arch` as a run records it: a file made absolute (the later stages run from any folder), the rest as given."""
    if not is_user_arch(arch):
        return arch
    source, name = _split(arch)
    if source.endswith(".py"):
        return f"{Path(source).expanduser().resolve()}:{name}"
    if (here := _in_current_folder(source)) is not None:  # by its file: the later stages run from anywhere
        return f"{here}:{name}"
    return arch


def _in_current_folder(module: str) -> Path | None:
    """The file of a module of the current folder (MODULE:NAME), as `python -m cnnpack` finds it first on sys.path
    (the `cnnpack` script has no current folder on it), or None."""
    path = Path.cwd() / f"{module}.py"
    return path.resolve() if "." not in module and path.is_file() else None


def label(arch: str) -> str:
    """The short name of the model (Triton model names, default run folders): NAME in lower case for your own."""
    if not is_user_arch(arch):
        return arch
    return re.sub(r"[^a-z0-9_]+", "_", arch.rpartition(":")[2].lower()).strip("_") or "model"


def display(arch: str) -> str:
    """`arch` without the folders of its file (what an artifact's metadata says: no path of this machine)."""
    if not is_user_arch(arch):
        return arch
    source, _, name = arch.rpartition(":")
    return f"{Path(source).name}:{name}" if source.endswith(".py") else arch


def _source_file(arch: str) -> Path:
    source, _ = _split(arch)
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserInputError(f"--arch {arch}: {path} is not a file" + ("" if path.exists() else " (not found)"))
        return path.resolve()
    if (here := _in_current_folder(source)) is not None:
        return here
    first = source.split(".")[0]  # a package of the current folder: found as `python -m cnnpack` finds it
    if (Path.cwd() / first / "__init__.py").is_file() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError) as e:  # a parent package that fails to import
        raise UserInputError(f"--arch {arch}: cannot import {source} ({one_line(e, 160)})") from None
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise UserInputError(f"--arch {arch}: no module {source} is importable here (install its package, or give "
                             "the file: --arch path/to/file.py:NAME)")
    return Path(spec.origin)


def _digest(path: Path, helpers: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(path.read_bytes())
    for name in helpers:  # (a helper gone since: its absence is the change)
        h.update(f"\0{name}\0".encode())
        with contextlib.suppress(OSError):
            h.update(Path(path.parent, name).read_bytes())
    return h.hexdigest()


def source_record(arch: str) -> dict:
    """{"path", "sha256", "imports"} of the code that defines the model: its file and the files of its folder that
    the file imports (`imports`, relative; their bytes are in the sha256: an edit of a helper is an edit of the
    model). An installed module (package.module:NAME) by its own file, its package being versioned."""
    path = _source_file(arch)
    arch = recorded(arch)  # (a module of the current folder: as its file)
    if not _split(arch)[0].endswith(".py"):
        return {"path": str(path), "sha256": _digest(path)}
    helpers = local_imports(path)
    return {"path": str(path), "sha256": _digest(path, helpers), "imports": list(helpers)}


def local_imports(main: Path) -> tuple[str, ...]:
    """The files of `main`'s folder that it imports, and that those import, relative: read from the code (every
    import statement, inside functions too), not from what a process happened to import. The folder is first on
    sys.path when the file runs, so `import blocks` is ./blocks.py (or ./blocks/) where that exists."""
    folder, found, todo = main.parent, set(), [main]
    while todo:
        file = todo.pop()
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                here, up = list(file.parent.relative_to(folder).parts), max(node.level - 1, 0)
                if up > len(here):  # (a relative import above the folder)
                    continue
                base = here[:len(here) - up] if node.level else []  # from . import x: x beside this file
                module = [*base, *(node.module.split(".") if node.module else [])]
                names = [".".join([*module, a.name]) for a in node.names] + ([".".join(module)] if module else [])
            else:
                continue
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c: a/__init__.py, a/b/__init__.py or a/b.py, ...
                    for candidate in (folder.joinpath(*parts[:i]).with_suffix(".py"),
                                      folder.joinpath(*parts[:i], "__init__.py")):
                        if candidate.is_file() and candidate != main:
                            rel = str(candidate.relative_to(folder))
                            if rel not in found:
                                found.add(rel)
                                todo.append(candidate)
    return tuple(sorted(found))


def spec_fields(arch: str) -> dict:
    """The model spec's `arch` (and, for your own model, `arch_source`) for `arch` as given."""
    return {"arch": recorded(arch), "arch_source": source_record(arch)} if is_user_arch(arch) else {"arch": arch}


def _module(arch: str, path: Path):
    """The module; every failure of its import one line."""
    source = _split(arch)[0]
    try:
        return _load(str(path) if source.endswith(".py") else source, _digest(path))
    except SyntaxError as e:
        raise UserInputError(f"--arch {arch}: {path} is not valid Python ({e.msg}, line {e.lineno})") from None
    except SystemExit as e:  # a script's top level: sys.exit(), or argparse reading cnnpack's own arguments
        raise UserInputError(f"--arch {arch}: importing {path} exited (SystemExit {e.code}): its script part runs at "
                             "import; put it under `if __name__ == \"__main__\":`") from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import
        hint = (" (a module of a package: give it as package.module:NAME, from the folder above the package)"
                if "relative import" in str(e) else "")
        raise UserInputError(f"--arch {arch}: importing {path} failed ({type(e).__name__}: "
                             f"{one_line(e, 160)}){hint}") from None


@cache
def _load(source: str, digest: str) -> object:
    """A file executed once per content (its folder first on sys.path while it runs, as `python FILE` has it, and
    last after, for the imports its functions make when called); a module path imported as Python imports it."""
    if not source.endswith(".py"):
        return importlib.import_module(source)
    path = Path(source)
    folder = str(path.parent)
    name = f"cnnpack_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and pickling look a class's module up here)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
        if folder not in sys.path:
            sys.path.append(folder)
    return module


def _accepts(fn, name: str) -> str | None:
    """How `fn` takes the argument `name`: "keyword" (by name, or by **kwargs; not nn.Module's own **kwargs, which
    refuse any), "positional" (positional-only), or None."""
    from torch import nn

    if inspect.isclass(fn) and fn.__init__ is nn.Module.__init__:
        return None
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    for p in params:
        if p.name == name:
            return "positional" if p.kind is p.POSITIONAL_ONLY else "keyword"
    return "keyword" if any(p.kind is p.VAR_KEYWORD for p in params) else None


def build(arch: str, num_classes: int, kwargs: dict, recorded_source: dict | None = None) -> nn.Module:
    """The network `arch` names, with `num_classes` outputs where it takes that argument. `recorded_source`: what the
    run recorded of its file; a file changed since is said once per process (the network is built from it as it
    is now)."""
    from torch import nn  # (the names above serve torch-free modules: triton_repo, the run folder's name)

    _, name = _split(arch)
    try:
        record = source_record(arch)
    except UserInputError as e:  # the run's own file gone since: where to look, and what does without it
        if not recorded_source:
            raise
        if Path(recorded_source.get("path", "")).is_file():  # a package's module, from another folder
            root = Path(recorded_source["path"]).parents[arch.rpartition(":")[0].count(".")
                                                         + (Path(recorded_source["path"]).name == "__init__.py")]
            raise UserInputError(f"{e}; the run's model is built from it: run the command from {root} (where it "
                                 "imports), or install its package; the run's exported files do not need it") from None
        raise UserInputError(f"{e}; the run's model is built from that file (your own network): put it back, or "
                             "use the run's exported files, which do not need it (e.g. evaluate --format onnx)"
                             ) from None
    if recorded_source and recorded_source.get("sha256") not in (None, record["sha256"]):
        key = (record["path"], record["sha256"])
        if key not in _warned:
            _warned.add(key)
            log.warning("warning: %s (or a file of its folder that it imports) changed since the run recorded its "
                        "model (sha256 %s..., now %s...); the network is built from the code as it is now",
                        record["path"], recorded_source["sha256"][:12], record["sha256"][:12])
    module = _module(arch, Path(record["path"]))
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(k for k, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        hint = f" (its nn.Module classes: {', '.join(found)})" if found else " (it defines no nn.Module class)"
        raise UserInputError(f"--arch {arch}: {record['path']} has no {name}{hint}")
    if isinstance(factory, nn.Module):  # `model = CNN()` at the end of a file
        raise UserInputError(f"--arch {arch}: {name} is a model (a {type(factory).__name__} object), not its class: "
                             "name the class, or a function that returns the model")
    if not callable(factory):
        raise UserInputError(f"--arch {arch}: {name} is a {type(factory).__name__}, not a class or function that "
                             "returns an nn.Module")
    takes = _accepts(factory, "num_classes")
    args = {"num_classes": num_classes} if takes == "keyword" else {}
    pos = (num_classes,) if takes == "positional" else ()
    call = f"{name}({', '.join([*map(repr, pos), *(f'{k}={v!r}' for k, v in {**args, **kwargs}.items())])})"
    try:
        model = factory(*pos, **args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's constructor may raise anything
        hint = ("; cnnpack calls it with num_classes (by that name) where it takes that argument, else with none"
                if isinstance(e, TypeError) and "argument" in str(e) else "")
        raise UserInputError(f"--arch {arch}: {call} failed ({type(e).__name__}: {one_line(e, 160)}){hint}") from None
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise UserInputError(f"--arch {arch}: {call} gave {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}, not an "
                             "nn.Module")
    if next(model.parameters(), None) is None:
        raise UserInputError(f"--arch {arch}: {call} has no parameters (nothing to train or load)")
    return model
